"""Bus: the MQTT adapter. Publishes the outbox's events and retained states; routes requests to
the control layer; a client for `ingestd request`. Imports the service layer and below."""
