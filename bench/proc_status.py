"""One field of /proc/self/status (VmRSS, VmHWM, ...), in KiB: the memory readings of the benchmarks."""


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)
