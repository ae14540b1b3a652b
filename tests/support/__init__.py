"""Helpers shared by the tests: stand-in servers, model folders, the kiln executable, fixtures."""
