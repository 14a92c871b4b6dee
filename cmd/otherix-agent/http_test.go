package main

import (
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
)

// apiTokens maps an agent's API address (host:port) to its token, for
// the requests below (testClient adds it).
var apiTokens sync.Map

// testClient sends the token of the agent a request goes to.
var testClient = &http.Client{Transport: tokenTransport{}}

type tokenTransport struct{}

func (tokenTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if tok, ok := apiTokens.Load(r.URL.Host); ok && r.Header.Get("Authorization") == "" {
		r = r.Clone(r.Context())
		r.Header.Set("Authorization", "Bearer "+tok.(string))
	}
	return http.DefaultTransport.RoundTrip(r)
}

func postRaw(t *testing.T, url, body string) (int, api.ErrorEnvelope) {
	t.Helper()
	resp, err := testClient.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var env api.ErrorEnvelope
	b, _ := io.ReadAll(resp.Body)
	json.Unmarshal(b, &env)
	return resp.StatusCode, env
}

func getRaw(t testing.TB, url string) (int, []byte) {
	t.Helper()
	resp, err := testClient.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// scrape reads /metrics into series -> value (label order as exposed).
func scrape(t testing.TB, base string) map[string]float64 {
	t.Helper()
	code, b := getRaw(t, base+"/metrics")
	if code != 200 {
		t.Fatalf("/metrics: %d", code)
	}
	out := map[string]float64{}
	for _, line := range strings.Split(string(b), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err == nil {
			out[line[:i]] = v
		}
	}
	return out
}

// waitLog waits for the agent's log to contain substr.
func waitLog(t *testing.T, a *standaloneAgent, substr string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(a.logText(), substr) {
		if time.Now().After(deadline) {
			t.Fatalf("agent log lacks %q:\n%s", substr, tail(a.logText(), 3000))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func patchRaw(t *testing.T, url, body string) (int, api.ErrorEnvelope) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPatch, url, strings.NewReader(body))
	resp, err := testClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var env api.ErrorEnvelope
	b, _ := io.ReadAll(resp.Body)
	json.Unmarshal(b, &env)
	return resp.StatusCode, env
}
