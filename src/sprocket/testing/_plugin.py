"""pytest plugin of sprocket.testing (registered through the pytest11 entry point)."""
