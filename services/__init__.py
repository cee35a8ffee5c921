"""One process per stage: settings, clients, topics and the run loop; logic lives in processors."""
