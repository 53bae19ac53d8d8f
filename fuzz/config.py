"""atheris harness: ``python fuzz/config.py -max_total_time=60`` (see fuzz/harness.py)."""

from harness import main

if __name__ == "__main__":
    main("config")
