pytest_plugins = ["peftcore.testing.plugin"]
