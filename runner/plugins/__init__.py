"""The built-in plugins: modules registered through the same hooks and loader as third-party ones.

See :mod:`runner.registries` for how they are loaded (and blocked, with ``RUNNER_BLOCK_PLUGINS``).
The core never imports these modules: it reaches their names only through the registries.
"""
