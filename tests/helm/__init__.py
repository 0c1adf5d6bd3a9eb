"""The Helm chart, the image, the dashboards and alert rules."""
