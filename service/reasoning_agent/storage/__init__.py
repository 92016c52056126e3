"""The database underneath the repositories: engines, sessions, fast writes, migrations."""
