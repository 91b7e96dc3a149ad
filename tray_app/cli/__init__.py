"""``lmgate``'s commands: serve, config, tokens/keys/pairing/devices, doctor, check, deploy."""
