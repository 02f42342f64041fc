"""What the agent does to the machine: Docker, files, git, nginx, cron, firewall, networks, systemd and services."""
