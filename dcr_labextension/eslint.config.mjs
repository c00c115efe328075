// ESLint for the JupyterLab extension: ESLint's recommended rules, typescript-eslint's type-checked rules
// (floating promises matter in code that talks to a server) and React's rules of hooks. `npm run lint`
// runs it with --max-warnings=0, then the prettier check; `make lint` runs that.
import js from '@eslint/js';
import tsPlugin from '@typescript-eslint/eslint-plugin';
import tsParser from '@typescript-eslint/parser';
import reactHooks from 'eslint-plugin-react-hooks';

const typeChecked = tsPlugin.configs['flat/recommended-type-checked'];

export default [
  { ignores: ['lib/', 'labextension/', 'node_modules/', 'coverage/'] },
  js.configs.recommended,
  ...typeChecked.map(config => ({ ...config, files: ['src/**/*.{ts,tsx}', 'test/**/*.ts'] })),
  {
    files: ['src/**/*.{ts,tsx}', 'test/**/*.ts'],
    languageOptions: {
      parser: tsParser,
      parserOptions: {
        project: ['./tsconfig.json', './tsconfig.test.json'],
        tsconfigRootDir: import.meta.dirname
      }
    },
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
      eqeqeq: ['error', 'smart'],
      // JupyterLab's idioms, as in JupyterLab's own sources: `namespace CommandIDs`/`namespace Private`,
      // and Lumino signals connected as `signal.connect(this._onChange, this)` (connect binds `this`).
      '@typescript-eslint/no-namespace': 'off',
      '@typescript-eslint/unbound-method': 'off'
    }
  },
  {
    files: ['src/**/*.tsx', 'src/**/*.ts'],
    plugins: { 'react-hooks': reactHooks },
    rules: {
      'react-hooks/rules-of-hooks': 'error',
      'react-hooks/exhaustive-deps': 'error'
    }
  },
  {
    files: ['*.js'],
    languageOptions: { sourceType: 'commonjs', globals: { module: 'writable', require: 'readonly' } }
  }
];
