"""A stand-in for ``lavis_accel.bench.machine.OtherLoad`` for bench tests, which must not depend on the machine."""


class FixedLoad:
    """Reports that other processes used a fixed ``share`` of the CPUs while a part was timed."""

    def __init__(self, share=0.0):
        self.share = share

    def __call__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
