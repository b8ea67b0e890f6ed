"""Signed pack updates on the device: verify (no IO), fetch, store (A/B slots), updater.

Checking apart from acting, as in python-tuf's ngclient: ``verify`` only decides,
``fetch`` only downloads, ``store`` only moves files and the state atomically, and
``updater`` runs the steps and reports each one.
"""
