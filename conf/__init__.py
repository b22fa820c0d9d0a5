# Makes conf/ importable as `keel.conf` so Hydra finds the configs inside the wheel
# (pkg://keel.conf) from any working directory.
