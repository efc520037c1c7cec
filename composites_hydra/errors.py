"""The errors of the Hydra edge, in a leaf module every other module of ``composites_hydra`` imports."""


class ConfigError(ValueError):
    """A composed config that cannot run; the scripts print the message and exit non-zero."""


class NoCompositeError(ConfigError):
    """No ``+composite=NAME`` was given; the message lists the choices."""
