"""Tests on a multi-node Ray cluster on one machine (#17); a package so the cluster fixture lives as long as the folder."""
