"""meshbake compiler: recipe.yaml -> validated plan -> deterministic launch bundle."""
__version__ = "0.1.0"
