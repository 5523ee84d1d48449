"""The fixed handlers: same file names as scenarios/, so that each diff is the lesson."""
