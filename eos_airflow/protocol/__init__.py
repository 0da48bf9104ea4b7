"""Protocol tier: commit protocols. Free of Airflow imports: testable and usable on their own."""
