"""pikachat: a group chat over a fanout exchange (receive.py, send.py, chat.py)."""
