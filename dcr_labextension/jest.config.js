/**
 * Jest runs the unit tests of the extension's pure modules (state handling, formatting) under Node;
 * they import nothing from JupyterLab, so no DOM or bundler is needed.
 */
module.exports = {
  testEnvironment: 'node',
  roots: ['<rootDir>/test'],
  testMatch: ['**/*.test.ts'],
  transform: {
    '^.+\\.tsx?$': ['ts-jest', { tsconfig: '<rootDir>/tsconfig.test.json' }]
  }
};
