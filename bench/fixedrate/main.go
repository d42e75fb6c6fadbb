// Command fixedrate sends HTTP GET requests at a fixed rate, open loop, and prints latency percentiles as JSON.
//
//	fixedrate -url http://127.0.0.1:8080/api/v1/stream/detect -rate 1000 -duration 10s -warmup 2s \
//	    -connections 16 -H 'Authorization: Bearer dlk_live_...'
//
// Request i is due at start + i/rate whatever happened to the earlier ones, and its latency is measured from
// that due time, not from when it was actually sent: a stall of the server (or of this program) shows as the
// latency of every request that should have gone out meanwhile, instead of being hidden by a client that
// waited (coordinated omission). Requests due while every connection is busy wait for one, and that wait
// counts. Requests due in the warm-up are sent but not reported. service_* are the same requests timed from
// when they were actually sent (what the server took, without waits for a connection or this program's own
// lateness), and send_lag_* that difference. Standard library only.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"time"
)

type headers []string

func (h *headers) String() string     { return strings.Join(*h, ", ") }
func (h *headers) Set(v string) error { *h = append(*h, v); return nil }

type sample struct {
	index   int
	latency time.Duration // from the request's due time to the end of its response
	lag     time.Duration // from its due time to when it was sent
	status  int           // 0: no response (connection error, timeout)
}

// Report is what the program prints: every latency in milliseconds.
type Report struct {
	Rate          float64        `json:"rate"`
	Seconds       float64        `json:"seconds"`
	Connections   int            `json:"connections"`
	Requests      int            `json:"requests"`
	OK            int            `json:"ok"`
	Non2xx        int            `json:"non_2xx"`
	Errors        int            `json:"errors"`
	Statuses      map[string]int `json:"statuses"`
	AchievedRate  float64        `json:"achieved_rate"`
	P50           float64        `json:"p50_ms"`
	P90           float64        `json:"p90_ms"`
	P99           float64        `json:"p99_ms"`
	P999          float64        `json:"p99_9_ms"`
	Max           float64        `json:"max_ms"`
	Mean          float64        `json:"mean_ms"`
	ServiceP50    float64        `json:"service_p50_ms"`
	ServiceP99    float64        `json:"service_p99_ms"`
	SendLagP99    float64        `json:"send_lag_p99_ms"`
	SendLagMax    float64        `json:"send_lag_max_ms"`
	FirstErrorMsg string         `json:"first_error,omitempty"`
}

func main() {
	var hs headers
	url := flag.String("url", "", "URL to GET")
	rate := flag.Float64("rate", 1000, "requests per second")
	duration := flag.Duration("duration", 10*time.Second, "length of the measured run")
	warmup := flag.Duration("warmup", 2*time.Second, "length of the unreported run before it")
	connections := flag.Int("connections", 16, "connections (each carries one request at a time)")
	timeout := flag.Duration("timeout", 5*time.Second, "time after which a request counts as an error")
	flag.Var(&hs, "H", "header 'Name: value' (repeatable)")
	flag.Parse()
	if *url == "" || *rate <= 0 || *duration <= 0 || *connections < 1 {
		fmt.Fprintln(os.Stderr, "fixedrate: -url, a positive -rate and -duration, and -connections >= 1 are needed")
		os.Exit(2)
	}
	header := http.Header{}
	for _, h := range hs {
		name, value, ok := strings.Cut(h, ":")
		if !ok {
			fmt.Fprintf(os.Stderr, "fixedrate: header %q is not 'Name: value'\n", h)
			os.Exit(2)
		}
		header.Add(strings.TrimSpace(name), strings.TrimSpace(value))
	}
	report, err := run(*url, header, *rate, *warmup, *duration, *connections, *timeout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fixedrate:", err)
		os.Exit(1)
	}
	out, _ := json.Marshal(report)
	fmt.Println(string(out))
}

func run(url string, header http.Header, rate float64, warmup, duration time.Duration, connections int,
	timeout time.Duration) (*Report, error) {
	interval := time.Duration(float64(time.Second) / rate)
	skip := int(math.Round(warmup.Seconds() * rate))
	total := skip + int(math.Round(duration.Seconds()*rate))
	// Room for every request: the schedule never waits for the workers.
	due := make(chan int, total)
	results := make(chan []sample, connections)
	firstErrors := make(chan string, connections)
	start := time.Now().Add(50 * time.Millisecond)
	dueAt := func(i int) time.Time { return start.Add(time.Duration(i) * interval) }

	var wg sync.WaitGroup
	for w := 0; w < connections; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// One transport per worker, one connection each: the load is spread like wrk's connections.
			client := &http.Client{
				Timeout: timeout,
				Transport: &http.Transport{
					MaxIdleConnsPerHost: 1,
					MaxConnsPerHost:     1,
					DisableCompression:  true,
				},
			}
			var mine []sample
			firstError := ""
			for i := range due {
				scheduled := dueAt(i)
				sent := time.Now()
				request, _ := http.NewRequest(http.MethodGet, url, nil)
				request.Header = header.Clone()
				response, err := client.Do(request)
				status := 0
				if err == nil {
					_, err = io.Copy(io.Discard, response.Body)
					response.Body.Close()
					status = response.StatusCode
				}
				if err != nil {
					status = 0
					if firstError == "" {
						firstError = err.Error()
					}
				}
				mine = append(mine, sample{i, time.Since(scheduled), sent.Sub(scheduled), status})
			}
			results <- mine
			firstErrors <- firstError
		}()
	}

	for i := 0; i < total; i++ {
		if wait := time.Until(dueAt(i)); wait > 0 {
			time.Sleep(wait)
		}
		due <- i
	}
	close(due)
	wg.Wait()
	close(results)
	close(firstErrors)
	finished := time.Now()

	report := &Report{Rate: rate, Seconds: duration.Seconds(), Connections: connections, Statuses: map[string]int{}}
	for e := range firstErrors {
		if e != "" && report.FirstErrorMsg == "" {
			report.FirstErrorMsg = e
		}
	}
	var latencies, lags, services []float64
	var sum float64
	for batch := range results {
		for _, s := range batch {
			if s.index < skip {
				continue
			}
			report.Requests++
			switch {
			case s.status == 0:
				report.Errors++
			case s.status >= 200 && s.status < 300:
				report.OK++
			default:
				report.Non2xx++
			}
			if s.status != 0 {
				report.Statuses[fmt.Sprint(s.status)]++
			}
			ms := float64(s.latency) / float64(time.Millisecond)
			latencies = append(latencies, ms)
			lags = append(lags, float64(s.lag)/float64(time.Millisecond))
			services = append(services, float64(s.latency-s.lag)/float64(time.Millisecond))
			sum += ms
		}
	}
	if len(latencies) == 0 {
		return nil, fmt.Errorf("no request was measured")
	}
	sort.Float64s(latencies)
	sort.Float64s(lags)
	sort.Float64s(services)
	report.AchievedRate = float64(report.Requests) / finished.Sub(dueAt(skip)).Seconds()
	report.P50 = percentile(latencies, 0.50)
	report.P90 = percentile(latencies, 0.90)
	report.P99 = percentile(latencies, 0.99)
	report.P999 = percentile(latencies, 0.999)
	report.Max = latencies[len(latencies)-1]
	report.Mean = sum / float64(len(latencies))
	report.ServiceP50 = percentile(services, 0.50)
	report.ServiceP99 = percentile(services, 0.99)
	report.SendLagP99 = percentile(lags, 0.99)
	report.SendLagMax = lags[len(lags)-1]
	return report, nil
}

// percentile is the smallest value at or above the q-th fraction of the sorted values (nearest rank).
func percentile(sorted []float64, q float64) float64 {
	rank := int(math.Ceil(q*float64(len(sorted)))) - 1
	if rank < 0 {
		rank = 0
	}
	return sorted[rank]
}
