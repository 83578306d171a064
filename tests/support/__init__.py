"""Test support: servers, fault injectors, node helpers and shared helpers (no tests here)."""
