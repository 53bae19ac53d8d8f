"""Test stub whose activation raises, as a stub does when its configuration lacks what it needs."""


def activate(url, bus, config):
    raise RuntimeError("configuration has no message node url")
