"""Helpers of the browser tests and of the demo tests: ``dcr demo`` as a subprocess, Playwright set-up."""
