"""Tools that read models and runs from the outside (moge fingerprint)."""
