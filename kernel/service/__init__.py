"""Service: the daemon process. Bootstrap, the daemon's window loop and signals, the control
layer (the one typed API that the CLI, the bus and HTTP call), status views and systemd
notify. Imports the engine and below."""
