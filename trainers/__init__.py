"""diffalign subpackage."""
