"""Tools that look at configs, models and runs from the outside: moge plan, moge fingerprint."""
