"""Fleet side: signed pack repository, rollouts and telemetry (grows with its issues)."""
