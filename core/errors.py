"""The error of a configuration that cannot work."""


class ConfigError(ValueError):
  """A configuration value that cannot work; the message names the field and a value that
  works. Entry points print it as one line and exit with status 2."""
