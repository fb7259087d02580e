"""kdcore's built-in plugins. Each module is one plugin, loaded through the ``kdcore`` entry-point
group exactly as a third-party plugin is (see kdcore's pyproject.toml)."""
