"""Search-space presets (TOML files) shipped with autoshrink."""
