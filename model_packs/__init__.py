"""Model packs: the on-disk format (manifest) and the builder that makes them.

`format` is imported by the device (to load and verify packs) and by the fleet (to
publish them); `build` is workstation-only and pulls the heavy `build` extra.
"""
