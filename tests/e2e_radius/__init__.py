"""End-to-end tests through Kamailio misc_radius / acc_radius."""
