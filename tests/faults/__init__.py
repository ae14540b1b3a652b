"""The fault suite: killed runs, full disks, corrupt caches, concurrent exports, Ollama faults, tokens."""
