"""Rollouts in health-gated waves: the spec, the device states, the halt rules (pure), the
store that keeps them, and the driver that sends the signed instructions (docs/fleet.md)."""
