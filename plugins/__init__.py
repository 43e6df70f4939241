"""autoshrink's built-in methods and tasks, written as any third-party plugin would be.

Each module here is one plugin; :data:`autoshrink.registry.BUILTIN_PLUGINS` lists them.
"""
