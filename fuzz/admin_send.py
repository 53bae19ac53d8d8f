"""atheris harness: ``python fuzz/admin_send.py -max_total_time=60`` (see fuzz/harness.py)."""

from harness import main

if __name__ == "__main__":
    main("admin_send")
