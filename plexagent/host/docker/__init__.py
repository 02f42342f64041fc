"""Docker: the thread pool, the facade, container specs, health, bind checks, builds and loads."""
