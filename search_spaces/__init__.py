"""The shipped search spaces (YAML), installed as package data for `fpstune study init`."""
