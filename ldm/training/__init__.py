"""The training plumbing both LightningModules and the CLI share: non-finite guard, fast paths, exact resume."""
