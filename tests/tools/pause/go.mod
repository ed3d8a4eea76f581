module opamp-operator.local/pause

go 1.24.0
