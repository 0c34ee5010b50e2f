"""opcheck cases, one module per operator: ``tests/cases/<op name>.py`` defines
``opcheck_cases() -> list[tuple[tuple, dict]]`` (positional args, keyword args) of representative
valid calls. ``test_registry.py`` requires one module per registered operator."""
