"""Example plugins (selected from the config, e.g. `train.step._target_=examples.<module>.<Class>`)."""
