/**
 * Jest runs the unit tests under Node: the pure modules (state handling, formatting), and the jobs model
 * and REST client, which load JupyterLab's services and Lumino's signals (CommonJS builds) but reach no
 * server: the tests stub the client and `ServerConnection.makeRequest`. No DOM or bundler is needed.
 */
module.exports = {
  testEnvironment: 'node',
  roots: ['<rootDir>/test'],
  testMatch: ['**/*.test.ts'],
  transform: {
    '^.+\\.tsx?$': ['ts-jest', { tsconfig: '<rootDir>/tsconfig.test.json' }]
  }
};
