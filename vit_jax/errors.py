"""User-facing errors: one `error:` line on stderr and exit code 2, no traceback.

Library code raises `UserError` (a `ValueError`, so API callers can catch either) for anything a user can fix:
a bad config value, an unknown model, a missing or corrupt file. CLIs run their body through `run_cli`.
Bugs stay ordinary exceptions with a traceback.
"""
import sys


class UserError(ValueError):
  """An error the user caused and can fix; the message names the bad value and says what to do."""


def run_cli(main, *args, **kwargs):
  """Calls `main`; a `UserError` becomes `error: <message>` on stderr and exit status 2."""
  try:
    return main(*args, **kwargs)
  except UserError as e:
    message = " ".join(str(e).split())  # exactly one line
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)

