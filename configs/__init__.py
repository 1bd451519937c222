"""The bundled training recipes (one `get_config(variant)` per file); see `metaembed configs`."""
