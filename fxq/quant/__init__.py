"""fxq subpackage."""
