"""Running a study: the runner validates and starts a run, a controller per study asks Optuna for
candidates and hands them to the pool of Ray workers, which evaluate them and report back."""
