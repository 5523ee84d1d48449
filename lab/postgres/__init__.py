"""Where the server comes from (provision: a URL, a container or a child process) and the schemas a run owns."""
