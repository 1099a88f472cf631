"""Fault injection: real processes killed, real servers misbehaving, real disks filling up, and a table of
bad inputs run through the real command line. What each test proves is listed in docs/reliability.md."""
