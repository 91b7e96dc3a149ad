"""Configuration: every setting declared once, read from defaults < TOML file < ``LMGATE_*``
environment < command-line flags."""
